"""Chaos scenarios: a workload through resilient_db while faults hit a simulated or real
cluster. The scenarios arrive with the chaos-suite issue; the network fault injector with the
failure-monitoring issue."""
