"""The benchmark programs: `turnout bench engine|serve` and the programs behind the figures
of docs/benchmarks.md (`python -m gateway.bench.NAME`). The tools' room: `turnout serve`
never imports this package."""
