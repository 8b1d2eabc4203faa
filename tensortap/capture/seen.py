"""What the filter saw, for the one message a run that wrote nothing at all ends with."""

from __future__ import annotations


class Seen:
    """The steps, roles and ranks of rejected forwards, and the layers and points of the names met."""

    MAX_STEPS = 4096  # past this many steps, no more are kept (the message shows a span)

    def __init__(self):
        self.values: dict[str, set] = {"steps": set(), "roles": set(), "ranks": set(), "layers": set(),
                                       "points": set()}

    def rejected(self, step, role, rank) -> None:
        """A forward (a scope) the filter rejected."""
        if len(self.values["steps"]) < self.MAX_STEPS:
            self.values["steps"].add(step)
            self.values["roles"].add(role)
            self.values["ranks"].add(rank)

    def name(self, layer: int, point: str) -> None:
        """A tap point name met for the first time."""
        self.values["layers"].add(layer)
        self.values["points"].add(point)

    def text(self) -> str:
        """e.g. "steps 0-99, roles draft,target, ranks 0, layers 3,78, points lse,q"."""
        return ", ".join(f"{key} {_span(values)}" for key, values in self.values.items() if values)


def filter_text(config) -> str:
    """The filter keys a TAP config sets, as they were given: "layers=0; steps=100-140"."""
    keys = config.to_json_dict()
    return "; ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k in ("layers", "steps", "ranks",
                     "points", "roles") if (v := keys.get(k)) is not None) or "none"


def _span(values) -> str:
    values = sorted(v for v in values if v is not None)
    if all(isinstance(v, int) for v in values) and len(values) > 4:
        return f"{values[0]}-{values[-1]}"
    return ",".join(str(v) for v in values) or "none"
