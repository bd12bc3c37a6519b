import pytest
import torch

from fluxnb.base import memory


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


@pytest.mark.skipif(not memory.proc_status(), reason="reads RssAnon from /proc (Linux)")
def test_free_hands_the_weights_ram_back_to_the_system():
    """A model of 20 MB tensors (the size of FLUX's NF4 weights) freed: its RAM leaves the process. glibc keeps
    freed blocks below its mmap threshold (raised up to 32 MiB by the first large free) inside the process, where
    a cgroup's or a Colab VM's limit still counts them (in the 8 GB card rehearsal, notebook 04, which moved its
    transformer between GPU and RAM, was killed at its 14 GiB limit)."""
    big = torch.ones(30 * 2**20 // 4)
    del big  # freed mmap'd memory: glibc raises its threshold, and the next 20 MB blocks come from its heap
    before = memory.proc_status()["RssAnon"]
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(20 * 2**20 // 4)) for _ in range(40)])  # 800 MB
    heap_top = torch.ones(20 * 2**20 // 4)  # allocated last: the heap's top stays in use, no automatic trim
    grown = memory.proc_status()["RssAnon"] - before
    assert grown > 0.9 * 40 * 20 / 1024  # GiB: the 40 tensors of 20 MiB, touched (glibc may reuse a few freed pages)
    memory.free(model)
    left = memory.proc_status()["RssAnon"] - before
    assert left < 0.2 * grown, f"{left:.2f} of {grown:.2f} GiB still resident after memory.free"
    del heap_top
