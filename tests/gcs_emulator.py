"""A Cloud Storage JSON API server on localhost for the gs:// tests, with the behaviours our clients need.

`gcp-storage-emulator` runs in the test process on 127.0.0.1. Every client is pointed at it through
its environment: `STORAGE_EMULATOR_HOST` for gcsfs (etils.epath's `gs://` backend) and
google-cloud-storage (tensorboardX's event files), `TENSORSTORE_GCS_HTTP_URL` for TensorStore
(orbax's array data), with TensorStore's test token instead of credentials.

The emulator is patched where it differs from Cloud Storage in ways our clients notice:

* object reads carry `x-goog-generation` / `x-goog-metageneration` headers (`_reads_carry_generations`);
* `objects.move` (`POST .../o/SRC/moveTo/o/DST`) exists (`_serves_move`).

A client that closes its connection before the answer is written is not reported: gcsfs asks for an
object and for a listing under its name at once and drops the listing when the object answers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Iterator

BUCKET = "test-bucket"


def _reads_carry_generations(emulator) -> None:
  """Makes the emulator's object reads send `x-goog-generation` / `x-goog-metageneration` headers.

  Cloud Storage sends them with every object read, and TensorStore takes an object's generation
  from them (it writes orbax's OCDBT manifest conditionally on it); the emulator sends only the
  JSON body, so without them TensorStore refuses its own manifest ("Malformed StorageGeneration").
  """
  from gcp_storage_emulator.handlers import objects

  def with_generation(handler):
    def handle(request, response, storage, *args, **kwargs):
      handler(request, response, storage, *args, **kwargs)
      if response.status in (200, 206) and "object_id" in request.params:
        try:
          obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 -- not an object read: nothing to add
          return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    handle.adds_generation = True
    return handle

  for _, methods in emulator.HANDLERS:
    for method, handler in list(methods.items()):
      if handler in (objects.download, objects.get):
        methods[method] = with_generation(handler)


def _serves_move(emulator) -> None:
  """Adds Cloud Storage's `objects.move`: `POST /storage/v1/b/B/o/SRC/moveTo/o/DST`.

  Cloud Storage renames an object within a bucket in one call and answers with the destination's
  object resource. gcsfs (and so every `epath.Path.replace`/`rename` on gs://) tries it first; the
  emulator answers 501, which gcsfs retries with exponential back-off (32 s measured) before it
  falls back to a copy and a delete. Every rename of a run (its config, data counts, size index,
  results) then took half a minute with no CPU in use, which looked like a stalled run.
  """
  from http import HTTPStatus

  from gcp_storage_emulator import settings
  from gcp_storage_emulator.exceptions import Conflict, NotFound
  from gcp_storage_emulator.handlers import objects

  def move(request, response, storage, *args, **kwargs):
    bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
      moved = objects._copy(request.base_url, storage, bucket, src, bucket, dst)  # noqa: SLF001
      storage.delete_file(bucket, src)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
    except Conflict:
      response.status = HTTPStatus.CONFLICT
    else:
      response.json(moved)

  routes = tuple((rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                  rf"(?P<dest_object_id>.*[^/]+)$", {"POST": move}) for prefix in (settings.API_ENDPOINT, ""))
  if not any(r[0] == routes[0][0] for r in emulator.HANDLERS):
    emulator.HANDLERS = routes + tuple(emulator.HANDLERS)  # before the generic object routes


def patch(emulator) -> None:
  """All of the above, once per process."""
  _reads_carry_generations(emulator)
  _serves_move(emulator)


def client_environment(url: str) -> dict[str, str]:
  """Environment variables that point gcsfs, google-cloud-storage and TensorStore at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
      # gcsfs asks the storage-control gRPC API for a bucket's layout (hierarchical namespace,
      # zonal) before each operation; the emulator has no such API, and a plain bucket takes the
      # same code path as this setting.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


@contextlib.contextmanager
def running() -> Iterator[str]:
  """Starts the patched emulator with bucket `BUCKET` on a free port; yields its URL."""
  from gcp_storage_emulator import server as emulator
  patch(emulator)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  srv = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  srv.start()
  httpd = srv._api._httpd  # noqa: SLF001 -- the emulator exposes no other handle on its HTTP server
  report = httpd.handle_error
  def handle_error(request, client_address):
    if not isinstance(sys.exc_info()[1], ConnectionError):  # BrokenPipeError, ConnectionResetError
      report(request, client_address)
  httpd.handle_error = handle_error
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    srv.stop()


@contextlib.contextmanager
def pointed_at(url: str) -> Iterator[dict[str, str]]:
  """This process's clients use `url` for the body; yields the variables."""
  env = client_environment(url)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
