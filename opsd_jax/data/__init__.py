"""Data: host-side preprocessing of video frames, images and audio into the thinker's input arrays, and the
chat-template prompt builder that lays out the placeholder tokens those arrays fill."""
