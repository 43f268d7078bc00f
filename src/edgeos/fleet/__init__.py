"""The fleet: the control plane server (enrollment, identity, TUF repository, rollouts).

Never imported by the node.
"""
