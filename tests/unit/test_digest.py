"""Replica digests: equal replicas agree, one changed element is found and named, and
the names are those the simulator's replica invariant uses."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from flashtrain.train.digest import replica_checksums, tensor_checksum
from flashtrain.train.replicas import digest_of, divergence


def _replica(seed: int = 0):
    """A trained replica: a small convolutional net with BatchNorm after two SGD steps
    with momentum, so the optimizer holds state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model, optimizer


def _copy(model, optimizer):
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    # A deep copy: load_state_dict keeps tensors that need no cast, shared with the source.
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return twin, twin_opt


def test_the_same_state_gives_the_same_digest_in_another_replica():
    model, optimizer = _replica()
    twin, twin_opt = _copy(model, optimizer)
    mine, theirs = replica_checksums(model, optimizer), replica_checksums(twin, twin_opt)
    assert mine == theirs and digest_of(mine) == digest_of(theirs)
    assert divergence(7, [mine, theirs, mine]) is None
    # Parameters and momentum are both in it, by name.
    first = next(name for name, _ in model.named_parameters())
    assert first in mine and f"optimizer state of {first} (momentum_buffer)" in mine


def test_one_changed_element_is_named_with_its_rank():
    model, optimizer = _replica()
    twin, twin_opt = _copy(model, optimizer)
    name, param = list(twin.named_parameters())[2]
    with torch.no_grad():
        param.view(-1)[param.numel() // 2] = torch.nextafter(
            param.view(-1)[param.numel() // 2], torch.tensor(1.0))  # one ulp
    sums = [replica_checksums(model, optimizer) for _ in range(3)]
    sums.insert(2, replica_checksums(twin, twin_opt))
    message = divergence(40, sums)
    assert message == f"replicas diverged at the commit of step 40: rank 2 differs from rank 0 in {name}"


def test_optimizer_state_is_named_as_such():
    model, optimizer = _replica()
    twin, twin_opt = _copy(model, optimizer)
    name, param = next(iter(twin.named_parameters()))
    with torch.no_grad():
        twin_opt.state[param]["momentum_buffer"].view(-1)[0] += 1.0
    message = divergence(5, [replica_checksums(model, optimizer),
                             replica_checksums(twin, twin_opt)])
    assert message.endswith(f"rank 1 differs from rank 0 in optimizer state of {name} "
                            "(momentum_buffer)")


def test_batchnorm_running_statistics_are_left_out():
    """Each replica updates them from its own batch: they differ legitimately."""
    model, optimizer = _replica()
    twin, twin_opt = _copy(model, optimizer)
    twin.train()
    with torch.no_grad():
        twin(torch.randn(4, 3, 16, 16))  # moves the running statistics only
    assert any("running_mean" in n for n, _ in model.named_buffers())
    assert replica_checksums(model, optimizer) == replica_checksums(twin, twin_opt)


def test_checksum_sees_a_single_bit_and_the_dtype_and_shape():
    base = torch.arange(10, dtype=torch.float32)
    flipped = base.clone()
    flipped.view(torch.int32)[3] ^= 1
    assert tensor_checksum(base) != tensor_checksum(flipped)
    assert tensor_checksum(base) != tensor_checksum(base.view(2, 5))
    assert tensor_checksum(base[:3].to(torch.float16)) != tensor_checksum(base[:3])
    assert tensor_checksum(base) == tensor_checksum(base.clone())


def test_the_majority_is_the_reference_and_every_other_rank_is_named():
    good, bad = {"a": 1, "b": 2}, {"a": 1, "b": 3}
    assert divergence(3, [bad, good, good]) == (
        "replicas diverged at the commit of step 3: rank 0 differs from rank 1 in b")
    many = {f"t{i}": 0 for i in range(7)}
    other = {f"t{i}": 1 for i in range(7)}
    assert divergence(3, [many, other]).endswith("in t0, t1, t2, t3 and 3 more")
