"""asbuilt command line."""
def main():
    print("hello")
