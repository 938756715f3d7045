# The PodPulse image: Ray 2.60.0 on Python 3.11 plus the podpulse package (CLI, actors,
# Serve deployments, storage backends, operator). One image runs every pod: the Ray head
# and workers of the RayCluster / RayService / RayJobs, the migration Jobs and the operator.
#
#   docker build -t podpulse:2.60.0-py311 .
#   docker build --build-arg BASE=my-registry/ray:2.60.0-py311 -t podpulse:2.60.0-py311 .
#
# The tag starts with the Ray version because KubeRay's rayVersion and the image must
# agree (tests/test_manifests.py checks the manifests). The development machine has no
# Docker Hub: the end-to-end tests build the same image from Debian's packages instead
# (testbed/images.py, bookworm's Python 3.11, a user ray 1000:100), so keep this file simple
# enough to review by eye.

# BASE: Ray must equal the ray pin in pyproject.toml (ray[serve,data]==2.60.0), so pip
# keeps the image's Ray instead of installing a second one; Python 3.11 is pyproject's
# range. Another base (a mirror of rayproject/ray, or your own) needs the same Ray and
# Python, a user 1000 in group 100, and pip on PATH for that user.
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}

# rayproject images run as user "ray" (uid 1000, group users/100) with conda's Python
# first on PATH; installing as that user keeps `podpulse` and `kopf` on the same PATH.
WORKDIR /home/ray/podpulse
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs (see .dockerignore): pyproject.toml, README.md (the
# package's readme) and the packages listed in [tool.setuptools.packages.find].
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 podpulse ./podpulse
COPY --chown=1000:100 storage ./storage
COPY --chown=1000:100 actors ./actors
COPY --chown=1000:100 analytics ./analytics
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 deployments ./deployments
COPY --chown=1000:100 crds ./crds
COPY --chown=1000:100 testbed ./testbed
COPY --chown=1000:100 bench ./bench
COPY --chown=1000:100 cli ./cli

# A regular (not editable) install: the code lives in site-packages, so the Ray Serve
# import path deployments.app:api and `kopf run -m crds.operator` work from any directory.
RUN pip install . && podpulse --help > /dev/null && python -c "import crds.operator, deployments.app"

# Relative paths (podpulse-data/...) resolve here; on Kubernetes, mount volumes at absolute
# paths instead (the manifests use /data/models for the model registry).
WORKDIR /home/ray
# No CMD: KubeRay sets the Ray pods' command; the Jobs and the operator Deployment set theirs.
