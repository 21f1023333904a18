"""`turnout sim`: the routing simulator (simulator.py), its replica model (engine.py) and its
workloads (workloads.py). The tools' room: `turnout serve` never imports this package."""
