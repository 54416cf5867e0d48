"""Fine-tuning stages (classification, instruction following), each a loss and a batch source for the one
trainer in `llmscratch.train.trainer`."""
