"""A client of the Kubernetes CRI image API (runtime.v1.ImageService) on containerd's socket: what kubelet calls.

containerd's CRI plugin serves it in its own namespace (k8s.io) and pulls with its configured snapshotter,
through the pull-time unpacker: the path remote snapshotters see with labels.
"""

from __future__ import annotations

import base64
import time

import grpc

from layerstore.errors import LiftoffError
from layerstore.pb.cri.runtime.v1 import api_pb2, api_pb2_grpc
from snapshotter.containerd_api import DEFAULT_ADDRESS, probe_socket

PULL_TIMEOUT = 1800.0
CALL_TIMEOUT = 60.0


class CRIError(LiftoffError):
    """A CRI call failed; `code` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class CRIImageClient:
    """PullImage, ImageStatus, ListImages and RemoveImage over a CRI socket (containerd's own, by default)."""

    def __init__(self, address: str = DEFAULT_ADDRESS) -> None:
        probe_socket(address, "the CRI runtime")
        self.address = address
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.stub = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIImageClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, method, request, timeout: float):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()
            if code is grpc.StatusCode.UNIMPLEMENTED:
                message = f"{self.address} does not serve the CRI image API: enable containerd's CRI plugin"
            else:
                message = f"CRI {what} on {self.address} failed ({code.name}): {e.details()}"
            raise CRIError(message, code) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once the CRI plugin answers (it starts serving a moment after containerd's socket appears)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.list()
                return
            except CRIError as e:
                if e.code is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def pull(self, image: str, credentials: tuple[str, str] | None = None, timeout: float = PULL_TIMEOUT) -> str:
        """Pull `image` as kubelet does; returns the image id (config digest) CRI answers."""
        request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image))
        if credentials:
            user, password = credentials
            auth = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.auth.CopyFrom(api_pb2.AuthConfig(username=user, password=password, auth=auth))
        return self._call(f"PullImage {image}", self.stub.PullImage, request, timeout).image_ref

    def status(self, image: str) -> api_pb2.Image | None:
        """The image as CRI knows it (by reference or id), or None."""
        request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image))
        response = self._call(f"ImageStatus {image}", self.stub.ImageStatus, request, CALL_TIMEOUT)
        return response.image if response.HasField("image") else None

    def list(self) -> list[api_pb2.Image]:
        return list(self._call("ListImages", self.stub.ListImages, api_pb2.ListImagesRequest(), CALL_TIMEOUT).images)

    def remove(self, image: str) -> None:
        """Remove the image (all its references); removing an unknown image succeeds."""
        request = api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image))
        self._call(f"RemoveImage {image}", self.stub.RemoveImage, request, CALL_TIMEOUT)
