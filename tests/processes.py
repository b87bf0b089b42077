"""Server processes the tests start on 127.0.0.1: a free port, a process group stopped by its PID, a moto S3 server.
Standard library only at import (boto3 is imported when a moto server is started), so a benchmark may use it too, as
benchmarks/bench_explorer_start.py does."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A loopback port no one listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, wait_s: float = 15) -> None:
    """SIGTERM to the process group ``proc`` leads (started with ``start_new_session=True``), SIGKILL if it has not
    exited after ``wait_s`` seconds: every child it started goes with it."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def moto_server(bucket: str = "acts"):
    """A moto S3 server (the venv's ``moto_server``) on a free loopback port with ``bucket`` created; yields its URL
    and stops the server's process group at the end. Credentials are moto's: any key, region us-east-1."""
    port = free_port()
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client(
            "s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        ).create_bucket(Bucket=bucket)
        yield url
    finally:
        stop_group(proc, wait_s=30)
