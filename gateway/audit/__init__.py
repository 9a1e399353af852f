"""The audit trail: records (`record`), their hash chain and signed checkpoints
(`chain`, `anchor`), the one writer (`writer`), verification (`verify`),
auditor queries (`query`), payload capture (`capture`) and retention (`prune`).
"""
