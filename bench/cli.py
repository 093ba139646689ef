"""`heed bench personalize|perf|batching|load|gate-audit|gate-bounds|gate-probes|rejudge|rerank|strength|dtype|recipes|correction-phrasing|report`: every command takes --out FILE and --config FILE."""
from __future__ import annotations

import importlib.util
import sys

COMMANDS = {
    "personalize": ("bench.personalize", "simulated users teach their adapters; acceptance, data efficiency, isolation"),
    "perf": ("bench.perf", "serving and store speed against the plain libraries"),
    "batching": ("bench.batching", "continuous batching against whole batches: chatting users, held-out evaluation"),
    "load": ("bench.load", "many users at once against a running server"),
    "gate-audit": ("bench.gate_audit", "after a kept personalize run: was each gate refusal right?"),
    "gate-bounds": ("bench.gate_bounds", "after a personalize run: what a tighter off-topic bound would have refused"),
    "gate-probes": ("bench.gate_probes", "after a kept personalize run: what each gate probe set shows of every adapter"),
    "rejudge": ("bench.rejudge", "after a kept personalize run: its adapters judged again under other generation settings"),
    "rerank": ("bench.rerank", "after a kept personalize run: best of k answers by each adapter's implicit reward"),
    "strength": ("bench.strength", "after a kept personalize run: each adapter served with its LoRA delta scaled"),
    "dtype": ("bench.dtype", "bf16 against fp32 here: learner and generation speed, batch invariance"),
    "recipes": ("bench.recipes", "learner recipes compared on one fixed set of collected feedback"),
    "correction-phrasing": ("bench.correction_phrasing", "which wording of an in-session correction the model follows"),
    "report": ("bench.report_cli", "render the latest results into bench/results/REPORT.md"),
}


def usage() -> str:
    lines = ["usage: heed bench COMMAND [--config FILE] [--out FILE] [options]", "", "commands:"]
    lines += [f"  {name:<12} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", "heed bench COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"heed bench: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if importlib.util.find_spec(module) is None:
        print(f"heed bench: {name} is not available in this checkout ({module} is missing)", file=sys.stderr)
        return 2
    mod = importlib.import_module(module)
    return int(mod.main(rest) or 0)

if __name__ == "__main__":
    sys.exit(main())
