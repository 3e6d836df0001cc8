"""The job scheduler: a queue on a Ray cluster (gang admission, priorities, preemption, retries).

state (records, the state file) -> admission (pure decisions) -> actor (the detached scheduler on the head, Ray Jobs)
client (find the cluster, reach the actor), cluster (a local cluster for one machine), cluster_yaml (the check of a
launcher config), metrics (cellray_* series). The CLI is jobs/commands/job.py and jobs/commands/cluster.py.
"""
