// module MoEReference
