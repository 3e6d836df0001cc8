"""Clusters: a local Ray head for one machine (`local`: start, stop, find it again), and the offline check of a Ray
cluster-launcher config (`launcher`: cluster.yaml's rules, and the largest cluster it can grow to). The CLI is
jobs/commands/cluster.py; the scheduler that runs on any cluster is jobs/scheduler/."""
