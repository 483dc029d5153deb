# make train: set up .venv and train on the bundled CCP sample (CPU, a few minutes), replacing
#             the previous demo run in results/demo
# make test:  set up .venv with the dev tools, lint (ruff), then run the test suite
# make translate: set up .venv and translate the bundled sample with the pretrained generators,
#                 then one photo from the photo alone (its masks predicted by
#                 pretrained/mask_predictor)
PYTHON := .venv/bin/python
DEMO_FLAGS := --dataroot datasets/ccp_sample --loadSizeH 72 --loadSizeW 48 \
	--fineSizeH 64 --fineSizeW 44 --ngf 16 --ndf 16 --max-epoch 25 --lr-decay-start-epoch 15 \
	--log-step 8 --save-interval 5 --monitor-path results/demo/monitor \
	--model-save-path results/demo/models --overwrite

PRETRAINED := pretrained/jeans2skirt_64x44

.PHONY: setup train test lint translate
setup: .venv/.installed

.venv/.installed: requirements.txt setup.sh
	bash setup.sh
	touch $@

# requirements-export.txt goes in with --no-deps: nnabla-converter's declared requirements
# would bring in TensorFlow, which export.py does not use.
.venv/.installed-dev: .venv/.installed requirements-dev.txt requirements-export.txt
	bash setup.sh requirements-dev.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-export.txt
	touch $@

train: setup
	$(PYTHON) train.py $(DEMO_FLAGS)

lint: .venv/.installed-dev
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PYTHON) -m pytest -q tests

translate: setup
	$(PYTHON) translate.py -o $(PRETRAINED) --direction AtoB --dataroot datasets/ccp_sample \
		--phase train --out results/pretrained/jeans2skirt
	$(PYTHON) translate.py -o $(PRETRAINED) --direction BtoA --dataroot datasets/ccp_sample \
		--phase train --out results/pretrained/skirt2jeans
	$(PYTHON) translate.py -o $(PRETRAINED) --direction AtoB \
		--image datasets/ccp_sample/valA/1065.png --out results/pretrained/from_photo
