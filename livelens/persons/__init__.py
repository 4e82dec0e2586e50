"""People in a frame (the seed's 人物属性识别): face detection, then attributes per face.

:class:`~livelens.persons.engine.PersonsEngine` is what ``/v1/persons`` and the ``persons``
section of ``/v1/analyze`` run, and what :mod:`livelens.persons.evaluate` measures.
"""
