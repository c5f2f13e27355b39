from wsd.guest.cli import main

main()
