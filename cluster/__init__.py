"""Cluster tooling for livelens: a local multi-node Ray cluster, deployment manifests, validators.

* :mod:`cluster.local` starts a head plus N worker raylets on 127.0.0.1 (``make cluster-up``).
* :mod:`cluster.runtime_env` is the one list of paths a ``working_dir`` upload must leave out.
* :mod:`cluster.validate` checks the launcher YAML, the KubeRay manifests and RayService's
  ``serveConfigV2`` offline.
"""
