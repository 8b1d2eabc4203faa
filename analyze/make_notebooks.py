"""Write the notebooks of analyze/ from the cells below, executed, outputs and figures included.

    python analyze/make_notebooks.py            # after editing a cell; commit the .ipynb files

They use only the public surface: the `tensortap` command line to make dumps, `tensortap.open`,
`tensortap.check`, `tensortap.diff` and `tensortap.plot`. The tests execute them again.
"""

import os
import sys

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

DEMO = (
    "import os, subprocess, sys, tempfile\n\n"
    "def demo(*options):\n"
    "    \"\"\"Run `tensortap demo` (4 CPU ranks, tiny sizes) into a new directory; return it.\"\"\"\n"
    "    out = os.path.join(tempfile.mkdtemp(prefix='tensortap-'), 'dump')\n"
    "    subprocess.run([sys.executable, '-m', 'tensortap.cli', 'demo', '--preset', 'tiny', '--steps', '2',\n"
    "                    '--out', out, *options], check=True, capture_output=True, env={**os.environ, 'TAP': ''})\n"
    "    return out\n"
)

LAUNDERED = [
    new_markdown_cell(
        "# The laundered-consensus bug, in a notebook\n\n"
        "`tensortap demo` runs a reference DCP sparse-MLA decode on 4 CPU ranks. Its MTP draft layer's parallel "
        "config is built the way vLLM 0.33.0's `create_draft_parallel_config` builds it, which does not copy "
        "`decode_context_parallel_size`: the draft runs DCP 1 against a DCP-4-sharded cache. "
        "Set `TENSORTAP_DUMP` to look at a dump of your own instead."),
    new_code_cell(
        DEMO + "\n"
        "import tensortap\n"
        "dump_dir = os.environ.get('TENSORTAP_DUMP') or demo()\n"
        "d = tensortap.open(dump_dir)\n"
        "d"),
    new_markdown_cell("One row per record; the capture-time stats are columns."),
    new_code_cell("d.records[['name', 'role', 'step', 'spec_pos', 'rank', 'shape', 'dtype', 'zero_heads', "
                  "'empty_rows']].head(12)"),
    new_markdown_cell("All-zero attention heads after the merge, per rank: the draft's ranks 1..3 emit nothing."),
    new_code_cell(
        "def zero_heads(role):\n"
        "    rows = ['step', 'spec_pos'] if role == 'draft' else ['step']\n"
        "    return d.select(point='merged_out', role=role).records.pivot_table(index=rows, columns='rank',\n"
        "                                                                       values='zero_heads')\n"
        "zero_heads('draft')"),
    new_code_cell("zero_heads('target')"),
    new_markdown_cell("Yet the hidden state after the o_proj all-reduce is identical on every rank:"),
    new_code_cell(
        "hidden = d.stack('hidden', over='rank', role='draft', step=0, spec_pos=0)  # [ranks, T, C]\n"
        "print(hidden.shape, all(bool((h == hidden[0]).all()) for h in hidden))"),
    new_markdown_cell("One forward of the draft: per-head norms by rank (one colour per rank), each rank's share "
                      "of the o_proj all-reduce, and the hidden state's agreement."),
    new_code_cell(
        "import tensortap.plot\n"
        "tensortap.plot.forward(d, step=0, role='draft', spec_pos=0);"),
    new_markdown_cell("`check` names it:"),
    new_code_cell(
        "report = tensortap.check(d)\n"
        "for verdict in report.verdicts:\n"
        "    print(verdict.name.upper(), verdict.explanation)\n"
        "sorted(report.codes())"),
]

DIFF = [
    new_markdown_cell(
        "# Two layouts, one model: DCP 4 against DCP 1\n\n"
        "The same inputs under TP4/DCP4 (with the draft's bug) and TP4/DCP1 (the draft config fixed). `diff` "
        "reassembles what does not depend on the layout (heads by `head_offset`, cache tokens by the sharding "
        "formulas) and says what it cannot compare. The target layers agree across the two layouts; the draft "
        "layer is where they part ways."),
    new_code_cell(
        DEMO + "\n"
        "import pandas as pd\n"
        "import tensortap\n"
        "runs = {'dcp4-bug': demo(), 'dcp1-fixed': demo('--dcp', '1', '--fixed')}\n"
        "target = tensortap.diff(runs['dcp4-bug'], runs['dcp1-fixed'], role_a='target')\n"
        "print('target:', target.mode, 'equal' if target.equal else target.first.label)"),
    new_markdown_cell("The target's summary: every point that the layout does not change is equal."),
    new_code_cell("pd.DataFrame(target.summary())"),
    new_code_cell("target.not_comparable"),
    new_markdown_cell("Now the whole dumps. The draft's query, reassembled by `head_offset`, still matches; its "
                      "attention output after the merge does not: ranks 1-3 emitted zeros for their heads."),
    new_code_cell(
        "report = tensortap.diff(runs['dcp4-bug'], runs['dcp1-fixed'])\n"
        "first, c = report.first, report.first.comparison\n"
        "print('first divergence:', first.label)\n"
        "print(f'  max |a-b| {c.max_abs:.3g} at {c.max_abs_at} (a={c.value_a:.4g}, b={c.value_b:.4g}); '\n"
        "      f'{c.over} of {c.total} rows over tolerance; cosine {c.cosine:.3f}')\n"
        "print('after:', report.context.label if report.context else '(the first pair)')\n"
        "pd.DataFrame(report.summary())[['point', 'pairs', 'differ', 'shape', 'max_abs', 'rel_l2', 'jaccard']]"),
    new_markdown_cell("The two runs' draft forwards side by side, on one scale:"),
    new_code_cell(
        "import tensortap.plot\n"
        "tensortap.plot.forwards([(name, tensortap.open(path)) for name, path in runs.items()],\n"
        "                        step=0, role='draft', spec_pos=0);"),
]


def write(name: str, cells, execute: bool = True) -> None:
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    if execute:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    nbformat.write(nb, os.path.join(HERE, name))


if __name__ == "__main__":
    execute = "--no-execute" not in sys.argv
    write("laundered_consensus.ipynb", LAUNDERED, execute)
    write("diff_layouts.ipynb", DIFF, execute)
