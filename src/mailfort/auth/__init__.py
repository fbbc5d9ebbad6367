"""Message authentication for the inbound MX: SPF, DKIM, DMARC, ARC and one
Authentication-Results header per message.

Entry point: `authenticate` (see `mailfort.auth.results`). Every DNS lookup goes through the
`mailfort.dns.Resolver` passed in.
"""

from mailfort.auth.arc import ARCResult, ARCSet, verify_arc
from mailfort.auth.dkim import DKIMResult, DKIMSignature, verify_dkim
from mailfort.auth.dmarc import DMARCResult, check_dmarc, organizational_domain
from mailfort.auth.results import AuthVerdict, authenticate, build_header, remove_forged_results
from mailfort.auth.spf import SPFCheck, SPFResult, check_spf

__all__ = [
    "ARCResult",
    "ARCSet",
    "AuthVerdict",
    "DKIMResult",
    "DKIMSignature",
    "DMARCResult",
    "SPFCheck",
    "SPFResult",
    "authenticate",
    "build_header",
    "check_dmarc",
    "check_spf",
    "organizational_domain",
    "remove_forged_results",
    "verify_arc",
    "verify_dkim",
]
