import pytest
import torch

from fluxnb import memory


def test_snapshot_and_table():
    stats = memory.snapshot()
    assert stats["cpu_rss_gib"] > 0.01
    table = memory.report("now")
    assert table.startswith("now") and "cpu_rss_gib" in table


def test_measure_records_time_and_memory():
    with memory.measure("alloc") as m:
        x = torch.ones(2**22)  # 16 MiB
        del x
    assert m.stats["seconds"] >= 0 and "cpu_rss_gib" in m.stats
    assert str(m).startswith("alloc")


def test_free_releases_weights_even_with_other_references():
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    other_reference = {"pipe": {"transformer": model}}
    weight = model[0].weight
    assert weight.numel() == 512 * 512
    memory.free(other_reference)
    assert all(p.numel() == 0 for p in model.parameters())
    assert weight.numel() == 0  # the storage is gone although `weight` still names the parameter


def test_free_says_what_it_gave_back_on_this_machine():
    model = torch.nn.Linear(512, 512)  # 512 x 513 fp32 numbers: 1.0 MiB
    freed = memory.free(model)
    assert freed.weights_gib * 1024 == pytest.approx(512 * 513 * 4 / 2**20)
    if not torch.cuda.is_available():  # never "freed 0.00 GiB of GPU memory" on a machine without one
        assert str(freed) == "emptied 1.0 MiB of weights in CPU RAM (no GPU here, so no GPU memory to free)"
