"""Evaluation of fine-tuned models: exact-match scoring on tasks with known answers (`tasks`) and LLM-as-judge
scoring of free-form answers through any OpenAI-compatible chat endpoint (`judge`)."""
