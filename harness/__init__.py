"""Test and demo harness for fabdeploy: throwaway hosts to deploy to."""
