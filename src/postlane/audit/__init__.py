"""The regulatory audit trail: hash-chained store, evidence, retention and webhooks."""
