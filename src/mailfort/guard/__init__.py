"""Anti-abuse mechanisms shared by the protocol servers: login throttling (more to come)."""
