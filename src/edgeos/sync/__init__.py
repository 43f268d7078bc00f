"""The node's side of the fleet protocol: enrollment, the TUF client, sync, apply and rollback."""
