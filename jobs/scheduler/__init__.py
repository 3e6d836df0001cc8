"""The job scheduler: a queue on a Ray cluster (gang admission, priorities, preemption, retries).

state (records, the state file) -> admission (pure decisions) -> actor (the detached scheduler on the head, Ray Jobs)
-> client (find the cluster, reach the actor), metrics (the queue's cellray_* series). Clusters themselves are
jobs/cluster/; the CLI is jobs/commands/job.py and jobs/commands/cluster.py.
"""
