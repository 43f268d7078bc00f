"""Keys, the fleet CA, certificates, token secrets and pins, TLS contexts."""
