# `make demo`: set up and run the whole shapes demo; `make scst`: then fine-tune it with SCST;
# `make blip`: on the demo's data, a BLIP-architecture model trained from scratch on it (no pretrained weights
# offline), evaluated like the demo model; `make test`: set up and run the tests.
PY := .venv/bin/python
DATA := data/shapes
NAME := shapes_5_cap_per_img_5_min_word_freq
CKPT := checkpoints/demo

.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -r requirements.txt
	touch $@

setup: .venv/installed

demo: .venv/installed
	$(PY) create_input_files.py --dataset shapes --output-folder $(DATA) --image-size 224 --overwrite
	$(PY) train.py --data-folder $(DATA) --data-name $(NAME) --checkpoint-dir $(CKPT) \
	    --encoder tf_efficientnet_lite0 --encoder-stride 16 --encoded-size 14 --cache-features \
	    --embed-dim 256 --attention-dim 256 --decoder-dim 256 --epochs 12 \
	    --alpha-c 0 --decoder-lr 1e-3 --batch-size 16 --dropout 0.1
	$(PY) eval.py --checkpoint $(CKPT)/checkpoint_best.pt --data-folder $(DATA) --data-name $(NAME) \
	    --split test --beam-sizes 1 3 5 --grounding
	$(PY) caption.py --checkpoint $(CKPT)/checkpoint_best.pt --img $(DATA)/shapes_raw/images/shapes_001150.jpg \
	    --out $(CKPT)/captions

# SCST after the demo's cross-entropy training: fine-tune its best checkpoint for CIDEr-D, then evaluate.
scst: .venv/installed
	$(PY) train.py --scst --resume $(CKPT)/checkpoint_best.pt --data-folder $(DATA) --data-name $(NAME) \
	    --checkpoint-dir $(CKPT)_scst --cache-features --epochs 10
	$(PY) eval.py --checkpoint $(CKPT)_scst/checkpoint_best.pt --data-folder $(DATA) --data-name $(NAME) \
	    --split test --beam-sizes 1 3 5

BLIP := checkpoints/blip
blip: .venv/installed
	test -f $(DATA)/WORDMAP_$(NAME).json || \
	    $(PY) create_input_files.py --dataset shapes --output-folder $(DATA) --image-size 224
	$(PY) init_blip.py --data-folder $(DATA) --data-name $(NAME) --out $(BLIP)_init --size small
	$(PY) train.py --model blip --pretrained $(BLIP)_init --data-folder $(DATA) --data-name $(NAME) \
	    --checkpoint-dir $(BLIP) --fine-tune-encoder --epochs 7 --batch-size 16 --decoder-lr 5e-4 --encoder-lr 5e-4 \
	    --val-max-len 20
	$(PY) eval.py --checkpoint $(BLIP)/checkpoint_best.pt --data-folder $(DATA) --data-name $(NAME) \
	    --split test --beam-sizes 1 3 5 --grounding
	$(PY) caption.py --checkpoint $(BLIP)/checkpoint_best.pt --img $(DATA)/shapes_raw/images/shapes_001150.jpg \
	    --out $(BLIP)/captions

test: .venv/installed
	$(PY) -m pytest -q tests

.PHONY: setup demo scst blip test
