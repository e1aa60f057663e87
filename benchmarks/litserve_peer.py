"""The LitServe peer's ``LitAPI`` (its own module: LitServe spawns workers, which must import the class by name)."""

from __future__ import annotations

import litserve as ls

from detserve.benchmarks.peers import PeerConfig, Pipeline


class DetectAPI(ls.LitAPI):
    """detserve's stages in LitServe's contract: decode_request -> batch -> predict -> unbatch -> encode_response."""

    def __init__(self, config: PeerConfig, stats_file: str | None):
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_wait_s)
        self.config = config
        self.stats_file = stats_file

    def setup(self, device):
        self.pipeline = Pipeline(self.config, self.stats_file)

    def decode_request(self, request):
        """One multipart ``image`` file -> a decoded, letterboxed job."""
        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        return self.pipeline.prepare(data)

    def predict(self, jobs):
        """One engine call for the batch (``batch`` is LitServe's default: a list of jobs)."""
        jobs = list(jobs) if isinstance(jobs, (list, tuple)) else [jobs]
        return list(zip(jobs, self.pipeline.run(jobs)))

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        """The body detserve answers with."""
        job, det = output
        if isinstance(det, Exception):
            from fastapi import HTTPException

            raise HTTPException(500, f"the model failed on this image: {det}")
        body = self.pipeline.encode(job, det)
        self.pipeline.counters.flush()
        return body


def serve(config: PeerConfig, port: int, stats_file: str | None) -> None:
    api = DetectAPI(config, stats_file)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=config.workers, timeout=30)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
