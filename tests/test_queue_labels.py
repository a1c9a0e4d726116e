"""fastalpha.Queue with labels: rows and labels stored side by side, FIFO, in state_dict;
a labelled queue takes labels with every batch; bad labels leave the queue unchanged."""
from __future__ import annotations

import pytest
import torch

import fastalpha


def _fifo_expectation(batches, size):
    """The last `size` (row, label) pairs of all batches, as a sorted list (ring order aside)."""
    pairs = [(tuple(r.tolist()), int(y)) for z, labels in batches for r, y in zip(z.double(), labels)]
    return sorted(pairs[-size:])


def _stored(queue):
    return sorted((tuple(r.tolist()), int(y)) for r, y in zip(queue.rows(), queue.labels()))


def test_labels_are_kept_beside_their_rows(gen):
    queue = fastalpha.Queue(size=7, dim=3, dtype=torch.float64)
    assert queue.labels() is None and not queue.labelled
    batches = []
    for batch in (3, 4, 2, 9, 1, 6):
        z = torch.randn(batch, 3, generator=gen, requires_grad=True)
        labels = torch.randint(0, 1000, (batch,), generator=gen, dtype=torch.int32)
        queue.enqueue(z, labels)
        batches.append((z.detach(), labels))
        assert queue.labels().dtype == torch.int64 and queue.labels().shape == (len(queue),)
        assert _stored(queue) == _fifo_expectation(batches, 7)
    # Row k of rows() carries label k of labels(): the pairs above match as pairs, not as sets.
    assert not queue.labels().requires_grad


def test_state_dict_round_trip_and_old_states(gen):
    labelled = fastalpha.Queue(size=5, dim=2)
    labelled.enqueue(torch.randn(4, 2, generator=gen), torch.tensor([3, 1, 4, 1]))
    state = labelled.state_dict()
    assert set(state) == {"bank", "count", "label_bank"}
    fresh = fastalpha.Queue(size=5, dim=2)
    fresh.load_state_dict(state)
    assert fresh.labelled and torch.equal(fresh.labels(), labelled.labels())
    assert torch.equal(fresh.rows(), labelled.rows())
    fresh.enqueue(torch.randn(1, 2, generator=gen), torch.tensor([9]))     # still takes labels
    # An unlabelled queue's state has the two entries of a state saved before queues had labels,
    # and loads into a queue that was labelled, which is then unlabelled like the state.
    plain = fastalpha.Queue(size=5, dim=2)
    plain.enqueue(torch.randn(3, 2, generator=gen))
    assert set(plain.state_dict()) == {"bank", "count"}
    fresh.load_state_dict(plain.state_dict())
    assert not fresh.labelled and fresh.labels() is None and torch.equal(fresh.rows(), plain.rows())
    fresh.enqueue(torch.randn(2, 2, generator=gen))


def test_labelled_queue_feeds_a_labelled_loss(gen):
    """queue.rows()/queue.labels() are what alpha_cl_loss's queue/queue_labels take."""
    queue = fastalpha.Queue(size=6, dim=4, dtype=torch.float64)
    queue.enqueue(torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    got = fastalpha.alpha_cl_loss(z, labels=y, rule="infonce", queue=queue.rows(), queue_labels=queue.labels(),
                                  backend="eager")
    want = fastalpha.alpha_cl_loss(z, labels=y, rule="infonce", queue=queue.bank.clone(),
                                   queue_labels=queue.label_bank.clone(), backend="eager")
    assert torch.equal(got, want)


def _snapshot(queue):
    return {k: v.clone() for k, v in queue.state_dict().items()}


def _unchanged(queue, before):
    after = queue.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("labels, error, message", [
    (torch.tensor([1, 2]), ValueError, "length 3"),
    (torch.tensor([[1, 2, 3]]), ValueError, "1-D"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "integer dtype"),
    (torch.tensor([True, False, True]), TypeError, "integer dtype"),
    ([1, 2, 3], TypeError, "torch.Tensor"),
    (torch.tensor([1, 2, 3], device="meta"), ValueError, "device"),
])
def test_bad_labels_leave_the_queue_unchanged(gen, labels, error, message):
    queue = fastalpha.Queue(size=5, dim=2)
    queue.enqueue(torch.randn(2, 2, generator=gen), torch.tensor([7, 8]))
    before = _snapshot(queue)
    with pytest.raises(error, match=message):
        queue.enqueue(torch.randn(3, 2, generator=gen), labels)
    assert _unchanged(queue, before)


def test_a_labelled_queue_keeps_getting_labels(gen):
    queue = fastalpha.Queue(size=5, dim=2)
    queue.enqueue(torch.randn(2, 2, generator=gen), torch.tensor([0, 1]))
    before = _snapshot(queue)
    with pytest.raises(ValueError, match="labelled"):
        queue.enqueue(torch.randn(2, 2, generator=gen))
    assert _unchanged(queue, before)
    plain = fastalpha.Queue(size=5, dim=2)
    plain.enqueue(torch.randn(2, 2, generator=gen))
    before = _snapshot(plain)
    with pytest.raises(ValueError, match="unlabelled rows"):
        plain.enqueue(torch.randn(2, 2, generator=gen), torch.tensor([0, 1]))
    assert _unchanged(plain, before)
