"""The tools built on the textbook and the file formats: the command line (``cli``), fine-tuning a
model folder (``finetune``), the demo, the benchmark (``bench``), the study, pretraining the embedded
base (``pretrain``) and step measurements (``measure``)."""
