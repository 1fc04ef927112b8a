"""The learner's per-device share: a device flooding uploads cannot starve the others.

Each update learns from at most `cloud.new_per_step` samples of one device, and the learner picks
the ready device whose last update is the oldest (round robin), so with the flooder's backlog
100x the others', every other device still gets one update per round.
"""

from __future__ import annotations

from fairedge.server.cloud import CloudService
from tests.test_cloud_service import CFG, images, one_torch_thread, served

__all__ = ["one_torch_thread"]


def test_a_flooding_device_gets_one_update_per_round_like_every_other(tmp_path):
    service = CloudService(served(), tmp_path / "state", CFG)  # 8 new samples per update
    order: list[str] = []
    update = service.update

    def recording_update(device):
        order.append(device.device_id)
        return update(device)

    service.update = recording_update  # type: ignore[method-assign]
    devices = ["flood", "cam-1", "cam-2", "cam-3"]
    for d in devices:
        service.register(d, "tiny", "v1")
    for b in range(1, 7):  # the flooder: 48 batches of 8 before anyone else uploads
        service.upload("flood", b, {"pixel_values": images(64, seed=b)})
    for d in devices[1:]:
        service.upload(d, 1, {"pixel_values": images(16, seed=hash(d) % 100)})  # two updates' worth each
    service.start(serve_grpc=False)
    try:
        service.flush(timeout=120)
    finally:
        service.stop()
    assert len(order) == 48 + 3 * 2
    first_rounds = order[:8]  # every device once per round while all are ready
    assert sorted(first_rounds[:4]) == sorted(devices) and sorted(first_rounds[4:]) == sorted(devices)
    assert order[8:] == ["flood"] * 46  # the flooder then has the learner to itself
    assert all(service.device(d).consumed == 16 for d in devices[1:])
