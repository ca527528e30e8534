def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real default model (about a minute); deselect with -m 'not slow'")
