"""Chaos scenarios: a workload through resilient_db while faults hit a simulated or real
cluster, judged by invariants over what the application observed (docs/chaos.md).

- :mod:`chaos.scenario`: the scenario schema and the shipped library (``chaos/scenarios``);
- :mod:`chaos.runner`: ``run(scenario, flavour=...)``; :mod:`chaos.__main__`: the CLI;
- :mod:`chaos.workload` and :mod:`chaos.analysis`: the application and the verdicts;
- :mod:`chaos.faults`: Toxiproxy's vocabulary, the local backend (on :mod:`chaos.netfault`),
  and :mod:`chaos.toxiproxy`;
- :mod:`chaos.control`: cluster control (the simulator) and :mod:`chaos.rds` (boto3);
- :mod:`chaos.report`: JSON, HTML, PNG and the terminal view; :mod:`chaos.fixtures`: pytest.

Importing :mod:`chaos` starts nothing.
"""
