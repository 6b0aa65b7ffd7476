module libduplex.dev/duplex

go 1.19
