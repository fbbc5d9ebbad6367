"""Outbound delivery services: the TLS policy layer for mail we send.

- `mtasts`: MTA-STS (RFC 8461) discovery, fetch, strict parsing and policy cache.
- `dane`: DANE for SMTP (RFC 7672, RFC 6698/7671): TLSA lookup and chain matching.
- `tlspolicy`: per-MX decision (dane, mta-sts-enforce, mta-sts-testing, opportunistic),
  the SSL contexts for each, and judging a finished handshake.
- `tlsrpt`: TLS-RPT (RFC 8460) result recording, rua discovery and the daily report.
- `contexts`: the TLS client contexts those modes use.

The queue and the SMTP delivery client use these; nothing here sends mail itself.
"""
