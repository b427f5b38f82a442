"""Shards over http: a real HTTP server on 127.0.0.1 (started and stopped by each test) serves
the shards; reading them equals reading the local files, also when the server drops the
connection in the middle of a shard, and a shard that cannot be fetched fails naming its url."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from manytask.config import config_from_dict
from manytask.data_pipeline import remote
from manytask.data_pipeline.loader import MultiSourceLoader
from manytask.data_pipeline.manifest import load_manifest
from manytask.data_pipeline.remote import HttpReader, RemoteReadError
from manytask.data_pipeline.shard_reader import ShardError
from manytask.data_pipeline.shard_writer import write_shards
from manytask.data_pipeline.stream import ShardStream


class ShardServer(ThreadingHTTPServer):
    """Serves `root` with Range support; `drops[path]` first replies are cut after half the body,
    `fail` makes every reply a 503."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.drops: dict[str, int] = {}
        self.fail = False
        self.requests: list[tuple[str, int, int, bool]] = []  # (path, first byte, bytes sent, cut)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ShardServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.server.fail:
            self.send_error(503)
            return
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        body = data[start:]
        with self.server.lock:
            drop = self.server.drops.get(self.path, 0) > 0 and len(body) > 2
            if drop:
                self.server.drops[self.path] -= 1
        sent = min(len(body) // 2, 1000) if drop else len(body)  # cut inside the first key
        self.server.requests.append((self.path, start, sent, drop))
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(body[:sent])
        self.wfile.flush()
        if drop:  # the connection dies mid-shard
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    srv = ShardServer(tmp_path)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    monkeypatch.setattr(remote, "RETRIES", 3)


def local_and_remote(server: ShardServer, layout: str = "chunk") -> tuple[Path, Path]:
    """Shards under the server's root and a second manifest naming them by http url."""
    n = 300
    rng = np.random.default_rng(0)
    write_shards(server.root / "local", {"id": np.arange(n), "x": rng.standard_normal((n, 4)).astype(np.float32)},
                 samples_per_shard=100, chunk_size=8, layout=layout)
    manifest = json.loads((server.root / "local" / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["url"] = f"{server.url}/local/{shard['url']}"
    (server.root / "remote").mkdir()
    (server.root / "remote" / "manifest.json").write_text(json.dumps(manifest))
    return server.root / "local", server.root / "remote"


def epoch_ids(path: Path, rank: int = 0, world: int = 1) -> list[int]:
    s = ShardStream(load_manifest(path), rank, world, seed=3, shuffle_buffer=32, fields=["id", "x"], block_size=10)
    out: list[int] = []
    for block in s.blocks():
        out += block.data["id"].tolist()
        if block.after.epoch:
            break
    return out


@pytest.mark.parametrize("layout", ["chunk", "sample"])
def test_http_shards_read_like_local_ones(server, layout):
    local, remote_dir = local_and_remote(server, layout)
    for rank in range(2):
        assert epoch_ids(remote_dir, rank, 2) == epoch_ids(local, rank, 2)
    # readers start inside shards with a Range request (manifest offsets)
    assert any(start > 0 for _, start, _, _ in server.requests)


def test_a_dropped_connection_resumes_where_it_stopped(server):
    local, remote_dir = local_and_remote(server)
    for i in range(3):
        server.drops[f"/local/shard-{i:06d}.tar"] = 2  # the first two replies of each shard die
    assert epoch_ids(remote_dir) == epoch_ids(local)
    for path in server.drops:
        mine = [(start, sent, cut) for p, start, sent, cut in server.requests if p == path]
        assert sum(cut for _, _, cut in mine) == 2
        for k, (start, sent, cut) in enumerate(mine):  # a retry asks for the byte the cut reply reached
            if cut:
                assert mine[k + 1][0] == start + sent


def test_the_stream_position_does_not_see_retries(server):
    local, remote_dir = local_and_remote(server)
    server.drops = {f"/local/shard-{i:06d}.tar": 1 for i in range(3)}
    states = []
    for path in (local, remote_dir):
        cfg = config_from_dict({
            "data": {"batch_size": 16, "shuffle_buffer": 32, "num_workers": 0,
                     "sources": [{"name": "s", "train": str(path), "inputs": ["x"], "labels": {"t": "id"}}]},
            "tasks": {"t": {"type": "regression", "out_dim": 1}},
        })
        with MultiSourceLoader(cfg, block_size=10) as loader:
            got = [loader.next_batch([37]).inputs["x"] for _ in range(5)]
            states.append((torch.cat(got), loader.state_dict()["sources"]["s"]))
    assert torch.equal(states[0][0], states[1][0])
    same = ("positions", "next_worker", "drop", "consumed")
    assert {k: states[0][1][k] for k in same} == {k: states[1][1][k] for k in same}
    assert sum(cut for _, _, _, cut in server.requests) >= 2  # the drops happened (2 shards reached)


def test_a_server_that_keeps_failing_names_the_url(server):
    _, remote_dir = local_and_remote(server)
    server.fail = True
    with pytest.raises(ShardError, match=r"shard-00000\d\.tar: cannot read from byte 0 after 4 tries .*503"):
        epoch_ids(remote_dir)
    assert len(server.requests) == 0  # 503s are answered before the body; none was served


def test_a_missing_url_is_not_retried(server):
    with pytest.raises(RemoteReadError, match=r"http://127\.0\.0\.1:\d+/nowhere\.tar: HTTP 404"):
        HttpReader(f"{server.url}/nowhere.tar")
