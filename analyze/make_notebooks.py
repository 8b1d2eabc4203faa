"""Write the notebooks of analyze/ from the cells below (run after editing them; tests execute the .ipynb)."""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

LAUNDERED = [
    new_markdown_cell(
        "# The laundered-consensus bug, in a notebook\n\n"
        "A reference DCP sparse-MLA decode on 4 CPU ranks (gloo). The MTP draft layer's parallel config is "
        "built like vLLM 0.33.0 builds it, which drops `decode_context_parallel_size`: the draft runs DCP 1 "
        "against a DCP-4-sharded cache. Set `TENSORTAP_DUMP` to look at a dump of your own instead."),
    new_code_cell(
        "import dataclasses, os, tempfile\n"
        "import tensortap\n"
        "from tensortap.distributed import spawn\n"
        "from tensortap.mla.scenario import Scenario, run_rank\n\n"
        "dump_dir = os.environ.get('TENSORTAP_DUMP')\n"
        "if dump_dir is None:\n"
        "    dump_dir = tempfile.mkdtemp(prefix='laundered-')\n"
        "    scenario = Scenario(preset='tiny', ranks=4, dcp=4, steps=2, spec_tokens=2)\n"
        "    spawn(run_rank, 4, kwargs=dict(scenario=dataclasses.asdict(scenario), tap_dir=dump_dir))\n"
        "d = tensortap.open(dump_dir)\n"
        "d"),
    new_markdown_cell("One row per record; the capture-time stats are columns."),
    new_code_cell("d.records[['name', 'role', 'step', 'spec_pos', 'rank', 'shape', 'dtype', 'zero_heads', 'empty_rows']].head(12)"),
    new_markdown_cell("All-zero attention heads after the merge, per rank: the draft's ranks 1..3 emit nothing."),
    new_code_cell(
        "d.select(point='merged_out').records.pivot_table(index=['role', 'step', 'spec_pos'], columns='rank',\n"
        "                                                 values='zero_heads', dropna=False)"),
    new_markdown_cell("Yet the hidden state after the o_proj all-reduce is identical on every rank:"),
    new_code_cell(
        "hidden = d.stack('hidden', over='rank', role='draft', step=0, spec_pos=0)  # [ranks, T, C]\n"
        "print(hidden.shape, all(bool((h == hidden[0]).all()) for h in hidden))"),
    new_code_cell(
        "from tensortap.plot import forward\n"
        "forward(d, step=0, role='draft', spec_pos=0);"),
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
        "The same inputs under TP4/DCP4 and TP4/DCP1 (the draft config fixed). `diff` reassembles what does "
        "not depend on the layout (heads by `head_offset`, cache tokens by the sharding formulas) and says "
        "what it cannot compare."),
    new_code_cell(
        "import dataclasses, tempfile\n"
        "import pandas as pd\n"
        "import tensortap\n"
        "from tensortap.distributed import spawn\n"
        "from tensortap.mla.scenario import Scenario, run_rank\n\n"
        "runs = {}\n"
        "for name, dcp in (('dcp4', 4), ('dcp1', 1)):\n"
        "    runs[name] = tempfile.mkdtemp(prefix=name + '-')\n"
        "    scenario = Scenario(preset='tiny', ranks=4, dcp=dcp, fixed=True, steps=2, spec_tokens=1)\n"
        "    spawn(run_rank, 4, kwargs=dict(scenario=dataclasses.asdict(scenario), tap_dir=runs[name]))\n"
        "report = tensortap.diff(runs['dcp4'], runs['dcp1'])\n"
        "print(report.mode, 'equal' if report.equal else report.first.label)\n"
        "pd.DataFrame(report.summary())"),
    new_code_cell("report.not_comparable"),
    new_markdown_cell("And what must agree across the ranks of one run:"),
    new_code_cell(
        "from tensortap.diffing import across_ranks, summarize_agreement\n"
        "pd.DataFrame(summarize_agreement(across_ranks(runs['dcp4'])))"),
]


def write(name: str, cells) -> None:
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, os.path.join(HERE, name))


if __name__ == "__main__":
    write("laundered_consensus.ipynb", LAUNDERED)
    write("diff_layouts.ipynb", DIFF)
