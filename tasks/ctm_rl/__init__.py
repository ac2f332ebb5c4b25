"""Reinforcement learning with PPO: the RL CTM and an LSTM baseline on masked classic control."""
