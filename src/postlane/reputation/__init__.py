"""Reputation: DMARC aggregate reports, Google Postmaster Tools, Microsoft SNDS, and the rules
review (docs/reputation.md)."""
