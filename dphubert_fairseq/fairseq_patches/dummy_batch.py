"""Patch: fairseq's dummy batch is never an empty one.

Target: ``EpochBatchIterator.first_batch``. The trainer runs an empty batch (``{}``) as a "dummy" copy of the
split's first batch, collated once per iterator. The plugin's collater returns ``{}`` for a batch whose items
all hold non-finite audio; when that is the first batch, the dummy itself is ``{}`` and the trainer fails with
"Invalid dummy batch: {}". The first batch that collates to something is taken instead; "DUMMY" (fairseq's own
placeholder, replaced by the first real batch) if none does.
Guard: ``first_batch`` (called on a stand-in whose first batch collates to ``{}``) returns ``{}``.
"""

from types import SimpleNamespace

from fairseq.data import iterators

from .patch import WRITTEN_FOR, Patch, mark, marked


def needed() -> bool:
    stand_in = SimpleNamespace(
        frozen_batches=((0,), (1,)),
        dataset=[None, 1],
        collate_fn=lambda items: {} if items == [None] else {"id": items},
    )
    return iterators.EpochBatchIterator.first_batch.fget(stand_in) == {}


def applied() -> bool:
    return marked(iterators.EpochBatchIterator.first_batch)


def apply() -> None:
    original = iterators.EpochBatchIterator.first_batch.fget

    def first_batch(self):
        batch = original(self)
        if batch == "DUMMY" or len(batch) > 0:
            return batch
        for indices in self.frozen_batches[1:]:
            batch = self.collate_fn([self.dataset[i] for i in indices])
            if len(batch) > 0:
                return batch
        return "DUMMY"

    iterators.EpochBatchIterator.first_batch = property(mark(first_batch))


PATCH = Patch(
    "dummy_batch",
    "fairseq.data.iterators.EpochBatchIterator.first_batch",
    WRITTEN_FOR,
    needed,
    applied,
    apply,
)
