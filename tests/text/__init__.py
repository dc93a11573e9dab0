"""Tests of qkv.text: tokenizer and chat templates."""
