"""Stage kind ``finetune``: supervised finetuning on chats."""
