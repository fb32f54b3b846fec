"""Infrastructure shared by the control plane and the data plane (security: certificates, identity, tokens, keys)."""
