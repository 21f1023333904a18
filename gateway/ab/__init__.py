"""`turnout ab report`: the A/B experiment report (report.py). The tools' room: `turnout
serve` never imports this package; the serving path writes samples with gateway.samples."""
