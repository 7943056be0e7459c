"""What the vision encoder sees: images and video frames made safe and sized as Hugging Face's
processor does, how many tokens each gets on this device, and the encoder-output caches
(memory and disk) that let a repeated picture skip the encoder."""
