"""Retention: remove whole checkpointed segments of old records.

For each stream, the newest checkpoint signed before the cut-off becomes the
stream's new starting point: the records up to it (and their encrypted
payloads) and the older checkpoints are deleted; that checkpoint stays, so the
remaining chain still verifies from its signed hash. A signed prune statement
is appended to the anchor *before* anything is deleted, so the anchor's older
checkpoints are accounted for and a deletion without one still shows up as
tampering. Records after the last checkpoint are never pruned.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.audit.anchor import AnchorFile
from gateway.audit.chain import Signer
from gateway.tables import audit_checkpoints, audit_payloads, audit_records


@dataclass(frozen=True)
class Pruned:
    stream_id: str
    through: int
    records: int


async def prune(engine: AsyncEngine, signer: Signer, anchor: AnchorFile, before: datetime) -> list[Pruned]:
    cps = audit_checkpoints.c
    async with engine.connect() as conn:
        points = (
            await conn.execute(
                sa.select(cps.stream_id, sa.func.max(cps.seq).label("through"))
                .where(cps.signed_at < before, cps.seq > 0)
                .group_by(cps.stream_id)
            )
        ).all()
    done: list[Pruned] = []
    for stream_id, through in points:
        await asyncio.to_thread(anchor.append, [signer.prune(stream_id, through)])
        recs = audit_records.c
        in_segment = sa.and_(recs.stream_id == stream_id, recs.seq <= through)
        async with engine.begin() as conn:
            finals = sa.select(recs.request_id).where(in_segment, recs.phase == "final")
            await conn.execute(sa.delete(audit_payloads).where(audit_payloads.c.request_id.in_(finals)))
            deleted = (await conn.execute(sa.delete(audit_records).where(in_segment))).rowcount
            await conn.execute(sa.delete(audit_checkpoints).where(cps.stream_id == stream_id, cps.seq < through))
        done.append(Pruned(stream_id, through, deleted))
    return done
