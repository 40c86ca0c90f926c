"""An enqueuing process for the idempotency races: ``python -m tests.fault.enqueue_process``.

Arguments: URL OUT SEED KEYS TRANSACTIONS GATE. Waits until the file GATE exists
(so that all processes start together), then runs TRANSACTIONS transactions.
Each enqueues 1-5 keys, half from a hot pool of 12 keys that every process
fights over and half from a cold pool of KEYS (in random order, duplicates
within one call included), with one enqueue_many call or one enqueue per key,
then commits or rolls back at random (one in three rolls back). A transaction
that fails (a deadlock, say) counts as rolled back. Writes one JSON line per
transaction to OUT: keys, ids returned, created flags, committed, error.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from mailoutbox import Mail, Outbox

HOT = 12


def main() -> None:
    url, out, seed, keys, transactions, gate = sys.argv[1:7]
    rng = random.Random(int(seed))
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    outbox = Outbox(engine, default_sender="noreply@example.com")
    while not Path(gate).exists():
        time.sleep(0.005)
    with open(out, "w") as f:
        for _ in range(int(transactions)):
            # Half the keys from a small hot pool that every process fights over, half
            # from a large cold one (where many keys are only ever rolled back).
            chosen = [
                f"hot-{rng.randrange(HOT)}"
                if rng.random() < 0.5
                else f"cold-{rng.randrange(int(keys))}"
                for _ in range(rng.randint(1, 5))
            ]
            mails = [
                Mail(template_id="race", idempotency_key=k, to=["a@example.com"], text=k)
                for k in chosen
            ]
            commit = rng.random() >= 1 / 3
            one_call = rng.random() < 0.5
            record: dict[str, object] = {"keys": chosen, "committed": False, "error": None}
            try:
                with engine.connect() as conn:
                    tx = conn.begin()
                    try:
                        if one_call:
                            results = outbox.enqueue_many(mails, connection=conn)
                        else:
                            results = [outbox.enqueue(m, connection=conn) for m in mails]
                        # Hold the transaction open a moment, as a real one would.
                        time.sleep(rng.random() * 0.005)
                        record["ids"] = [str(r.delivery_id) for r in results]
                        record["created"] = [r.created for r in results]
                        if commit:
                            tx.commit()
                            record["committed"] = True
                        else:
                            tx.rollback()
                    finally:
                        if tx.is_active:
                            tx.rollback()
            except sa.exc.DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None)
                record["error"] = f"{code} {type(exc.orig).__name__}"
            f.write(json.dumps(record) + "\n")
    engine.dispose()


if __name__ == "__main__":
    main()
